-- name: run_top_by_scalars
-- The run's most important nodes by the given scalars (e.g. the *_attribution ones): |value| summed over positions per prompt, averaged over all the run's prompts.
-- params: run, scalars, k = 10
WITH per_prompt AS (
    SELECT prompt_id, layer, node_type, node_index, scalar, sum(value) AS value
    FROM node_scalars
    WHERE run_id = $run AND list_contains($scalars, scalar::VARCHAR)
    GROUP BY ALL
)
SELECT node_label(layer, node_type, node_index) AS node_label, node_type, scalar,
       sum(abs(value)) / (SELECT n_prompts FROM runs WHERE run_id = $run) AS mean_abs,
       avg(value) AS mean_when_kept, count(*) AS n_prompts
FROM per_prompt
GROUP BY layer, node_type, node_index, scalar
ORDER BY mean_abs DESC, layer, node_index
LIMIT $k;
