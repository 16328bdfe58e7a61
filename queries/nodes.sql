-- name: top_nodes
-- Top-k nodes of one prompt by |value| of a scalar, with the token at each position.
-- params: run, prompt, scalar = 'mlp_act_times_grad', k = 20
SELECT prompt_id, position, token, layer, node_type, node_index, node_label, scalar, value
FROM nodes
WHERE run_id = $run AND prompt_id = $prompt AND scalar = $scalar
ORDER BY abs(value) DESC, layer, node_index, position
LIMIT $k;

-- name: run_top_nodes
-- Top nodes across a run: mean and max |value| of a scalar, and in how many prompts each node is among the top k.
-- params: run, scalar = 'mlp_act_times_grad', k = 20, per_prompt_k = 20
WITH per_node AS (
    SELECT prompt_id, layer, node_type, node_index, sum(value) AS value
    FROM node_scalars
    WHERE run_id = $run AND scalar = $scalar
    GROUP BY prompt_id, layer, node_type, node_index
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY prompt_id ORDER BY abs(value) DESC, layer, node_index) AS rank
    FROM per_node
)
SELECT layer, node_type, node_index, node_label(layer, node_type, node_index) AS node_label,
       count(*) AS n_prompts, avg(abs(value)) AS mean_abs, max(abs(value)) AS max_abs,
       avg(value) AS mean, count(*) FILTER (WHERE rank <= $per_prompt_k) AS n_top
FROM ranked
GROUP BY layer, node_type, node_index
ORDER BY mean_abs DESC, layer, node_index
LIMIT $k;

-- name: node_values
-- One node's values across the prompts of a run, with the token at each position.
-- params: run, layer, node_type, node_index, scalar = 'mlp_act_times_grad'
SELECT prompt_id, position, token, value
FROM nodes
WHERE run_id = $run AND layer = $layer AND node_type = $node_type AND node_index = $node_index
  AND scalar = $scalar
ORDER BY prompt_id, position;

-- name: run_top_attributions
-- The run's most important nodes of every type by act × grad: |value| summed over positions per prompt, averaged over all the run's prompts.
-- params: run, k = 10
WITH per_prompt AS (
    SELECT prompt_id, layer, node_type, node_index, scalar, sum(value) AS value
    FROM node_scalars
    WHERE run_id = $run AND scalar IN ('mlp_act_times_grad', 'attn_act_times_grad',
        'token_attribution', 'mlp_layer_act_times_grad', 'attn_head_act_times_grad',
        'sae_act_times_grad', 'sae_error_act_times_grad')
    GROUP BY ALL
)
SELECT node_label(layer, node_type, node_index) AS node_label, node_type, scalar,
       sum(abs(value)) / (SELECT n_prompts FROM runs WHERE run_id = $run) AS mean_abs,
       avg(value) AS mean_when_kept, count(*) AS n_prompts
FROM per_prompt
GROUP BY layer, node_type, node_index, scalar
ORDER BY mean_abs DESC, layer, node_index
LIMIT $k;
