-- name: top_edges
-- Top-k edges of one prompt by |value|, with readable node labels.
-- params: run, prompt, k = 20
SELECT up_label, up_pos, down_label, down_pos, value, up_layer, up_type, up_index,
       down_layer, down_type, down_index, down_input
FROM edges_labeled
WHERE run_id = $run AND prompt_id = $prompt
ORDER BY abs(value) DESC, up_layer, up_index, down_layer, down_index
LIMIT $k;

-- name: edges_into
-- Edges into one node of one prompt, largest |value| first.
-- params: run, prompt, layer, node_type, node_index, k = 20
SELECT up_label, up_pos, down_label, down_pos, down_input, value
FROM edges_labeled
WHERE run_id = $run AND prompt_id = $prompt AND down_layer = $layer AND down_type = $node_type
  AND down_index = $node_index
ORDER BY abs(value) DESC, up_layer, up_index
LIMIT $k;

-- name: edges_out_of
-- Edges out of one node of one prompt, largest |value| first.
-- params: run, prompt, layer, node_type, node_index, k = 20
SELECT up_label, up_pos, down_label, down_pos, down_input, value
FROM edges_labeled
WHERE run_id = $run AND prompt_id = $prompt AND up_layer = $layer AND up_type = $node_type
  AND up_index = $node_index
ORDER BY abs(value) DESC, down_layer, down_index
LIMIT $k;

-- name: circuit
-- The circuit of one prompt: every edge with |value| at or above a threshold.
-- params: run, prompt, threshold = 0.01
SELECT up_label, up_pos, down_label, down_pos, down_input, value, up_layer, up_type, up_index,
       down_layer, down_type, down_index
FROM edges_labeled
WHERE run_id = $run AND prompt_id = $prompt AND abs(value) >= $threshold
ORDER BY abs(value) DESC, up_layer, up_index, down_layer, down_index;

-- name: reachable_edges
-- Edges of one prompt (|value| at or above a threshold) on a path back from the target: a recursive walk upstream from the logit nodes.
-- params: run, prompt, threshold = 0.0
WITH RECURSIVE kept AS (
    SELECT * FROM edges
    WHERE run_id = $run AND prompt_id = $prompt AND abs(value) >= $threshold
), reached(layer, node_type, node_index, pos) AS (
    SELECT DISTINCT down_layer, down_type, down_index, down_pos FROM kept WHERE down_type = 'logit'
    UNION
    SELECT k.up_layer, k.up_type, k.up_index, k.up_pos
    FROM kept k
    JOIN reached r ON k.down_layer = r.layer AND k.down_type = r.node_type
        AND k.down_index = r.node_index AND k.down_pos IS NOT DISTINCT FROM r.pos
)
SELECT DISTINCT k.up_layer, k.up_type, k.up_index, k.up_pos, k.down_layer, k.down_type,
       k.down_index, k.down_pos, k.down_input, k.value
FROM kept k
JOIN reached r ON k.down_layer = r.layer AND k.down_type = r.node_type
    AND k.down_index = r.node_index AND k.down_pos IS NOT DISTINCT FROM r.pos
ORDER BY abs(k.value) DESC, k.up_layer, k.up_index, k.down_layer, k.down_index;

-- name: prompt_edges
-- Every stored edge of one prompt with its node keys: what circuit filtering (threshold, top-n, influence) starts from.
-- params: run, prompt
SELECT up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, down_layer,
       down_type::VARCHAR AS down_type, down_index, down_pos, down_input::VARCHAR AS down_input,
       value
FROM edges
WHERE run_id = $run AND prompt_id = $prompt;

-- name: target_token
-- The text of one prompt's target token (NULL for the loss): how circuits label the logit node.
-- params: run, prompt
SELECT target_token FROM prompts WHERE run_id = $run AND prompt_id = $prompt;
