-- The queries behind `actwh view`'s pages and the notebook pictures (actwh.views). Each page
-- shows the text of the query that produced its numbers, with the bound parameters.

-- name: view_runs
-- Every run with its model, target, status and prompt count: the runs page.
-- params:
SELECT r.run_id, r.name, m.name AS model, r.target, r.status, r.n_prompts, r.scalars,
       r.selection, r.created_at
FROM runs r
LEFT JOIN models m USING (model_id)
ORDER BY r.run_id;

-- name: view_run
-- One run's settings (the scalars it stores, its options as JSON) and its model's layer count.
-- params: run
SELECT r.run_id, r.name, r.target, r.status, r.n_prompts, r.scalars, r.selection,
       CAST(r.options AS VARCHAR) AS options, m.name AS model, m.n_layers
FROM runs r
LEFT JOIN models m USING (model_id)
WHERE r.run_id = $run;

-- name: view_prompts
-- The prompts of a run whose text contains a search string (case-insensitive), sorted by metric, loss, length or id.
-- params: run, search = '', sort = 'prompt_id', descending = False, k = 500
SELECT prompt_id, text, n_tokens, metric, loss, corrupt_metric, edges_to_target
FROM prompts
WHERE run_id = $run AND contains(lower(text), lower($search))
ORDER BY
    CASE WHEN $descending THEN NULL
         WHEN $sort = 'metric' THEN metric WHEN $sort = 'loss' THEN loss
         WHEN $sort = 'n_tokens' THEN n_tokens ELSE prompt_id END ASC NULLS LAST,
    CASE WHEN NOT $descending THEN NULL
         WHEN $sort = 'metric' THEN metric WHEN $sort = 'loss' THEN loss
         WHEN $sort = 'n_tokens' THEN n_tokens ELSE prompt_id END DESC NULLS LAST,
    prompt_id
LIMIT $k;

-- name: view_prompt
-- One prompt of a run: its text, length, metric and loss.
-- params: run, prompt
SELECT prompt_id, text, n_tokens, metric, loss, corrupt_metric, edges_to_target
FROM prompts
WHERE run_id = $run AND prompt_id = $prompt;

-- name: prompt_node_choices
-- The token-level scalars stored for one prompt, with the nodes (layer, type, index) that carry each: the prompt page's choices.
-- params: run, prompt
SELECT CAST(scalar AS VARCHAR) AS scalar, layer, CAST(node_type AS VARCHAR) AS node_type,
       node_index, node_label(layer, node_type, node_index) AS node_label,
       max(abs(value)) AS max_abs
FROM node_scalars
WHERE run_id = $run AND prompt_id = $prompt
GROUP BY ALL
ORDER BY scalar, max_abs DESC, layer, node_index;

-- name: token_values
-- A token-level scalar per position of one prompt, summed over the chosen nodes (a layer and node index, or all), beside each token; n_values counts the stored rows summed.
-- params: run, prompt, scalar, layer = NULL, node_index = NULL
SELECT t.position, t.token, sum(n.value) AS value, count(n.value) AS n_values
FROM tokens t
LEFT JOIN node_scalars n
    ON n.run_id = t.run_id AND n.prompt_id = t.prompt_id AND n.position = t.position
    AND n.scalar = $scalar
    AND ($layer IS NULL OR n.layer = $layer)
    AND ($node_index IS NULL OR n.node_index = $node_index)
WHERE t.run_id = $run AND t.prompt_id = $prompt
GROUP BY t.position, t.token
ORDER BY t.position;

-- name: prompt_tokens_list
-- The tokens of one prompt in order, with their ids.
-- params: run, prompt
SELECT position, token_id, token
FROM tokens
WHERE run_id = $run AND prompt_id = $prompt
ORDER BY position;

-- name: attention_heads
-- The heads (and pair-shaped scalars) stored for one prompt: the attention page's choices.
-- params: run, prompt
SELECT DISTINCT layer, head, CAST(scalar AS VARCHAR) AS scalar
FROM pair_scalars
WHERE run_id = $run AND prompt_id = $prompt
ORDER BY scalar, layer, head;

-- name: attention_cells
-- One head's pair-shaped scalar (attention pattern by default) for one prompt: every stored (query, key) cell.
-- params: run, prompt, layer, head, scalar = 'attn_pattern'
SELECT query_pos, key_pos, value
FROM pair_scalars
WHERE run_id = $run AND prompt_id = $prompt AND layer = $layer AND head = $head
  AND scalar = $scalar
ORDER BY query_pos, key_pos;

-- name: node_edges_in
-- The largest edges (by |value|) into one node of one prompt, at its position (NULL: positions summed).
-- params: run, prompt, layer, node_type, node_index, pos = NULL, k = 10
SELECT node_label(up_layer, up_type, up_index) AS up_label, up_layer,
       CAST(up_type AS VARCHAR) AS up_type, up_index, up_pos,
       CAST(down_input AS VARCHAR) AS down_input, value
FROM edges
WHERE run_id = $run AND prompt_id = $prompt AND down_layer = $layer AND down_type = $node_type
  AND down_index = $node_index AND down_pos IS NOT DISTINCT FROM CAST($pos AS INTEGER)
ORDER BY abs(value) DESC, up_layer, up_type, up_index, up_pos, down_input
LIMIT $k;

-- name: node_edges_out
-- The largest edges (by |value|) out of one node of one prompt, at its position (NULL: positions summed).
-- params: run, prompt, layer, node_type, node_index, pos = NULL, k = 10
SELECT node_label(down_layer, down_type, down_index) AS down_label, down_layer,
       CAST(down_type AS VARCHAR) AS down_type, down_index, down_pos,
       CAST(down_input AS VARCHAR) AS down_input, value
FROM edges
WHERE run_id = $run AND prompt_id = $prompt AND up_layer = $layer AND up_type = $node_type
  AND up_index = $node_index AND up_pos IS NOT DISTINCT FROM CAST($pos AS INTEGER)
ORDER BY abs(value) DESC, down_layer, down_type, down_index, down_pos, down_input
LIMIT $k;

-- name: node_value_by_prompt
-- One node's token-level scalar in every prompt of a run where it is stored, summed over positions: the circuit page's histogram.
-- params: run, layer, node_type, node_index, scalar
SELECT prompt_id, sum(value) AS value, count(*) AS n_rows
FROM node_scalars
WHERE run_id = $run AND layer = $layer AND node_type = $node_type AND node_index = $node_index
  AND scalar = $scalar
GROUP BY prompt_id
ORDER BY prompt_id;

-- name: enum_names
-- The node types and scalars this warehouse's schema knows (its ENUM values).
-- params:
SELECT 'node_type' AS kind, unnest(enum_range(NULL::node_type)) :: VARCHAR AS name
UNION ALL
SELECT 'scalar', unnest(enum_range(NULL::scalar)) :: VARCHAR;

-- name: view_open
-- Nothing: the statement that opens the read-only connection a page's queries then share.
-- params:
SELECT 1 AS open;
