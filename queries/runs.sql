-- name: compare_runs
-- Compare two runs on the prompts they share: a scalar's value per node in each, and the difference.
-- params: run_a, run_b, scalar = 'mlp_act_times_grad', k = 50
SELECT a.prompt_id, a.position, a.layer, a.node_type, a.node_index,
       node_label(a.layer, a.node_type, a.node_index) AS node_label,
       a.value AS value_a, b.value AS value_b, b.value - a.value AS difference
FROM node_scalars a
JOIN node_scalars b ON b.prompt_id = a.prompt_id AND b.position = a.position
    AND b.layer = a.layer AND b.node_type = a.node_type AND b.node_index = a.node_index
    AND b.scalar = a.scalar
WHERE a.run_id = $run_a AND b.run_id = $run_b AND a.scalar = $scalar
ORDER BY abs(b.value - a.value) DESC, a.prompt_id, a.layer, a.node_index, a.position
LIMIT $k;

-- name: prompt_metrics
-- Each prompt of a run with its metric and loss (and the other run's, to compare models or targets).
-- params: run, other_run = NULL
SELECT p.prompt_id, p.text, p.metric, p.loss, o.metric AS other_metric, o.loss AS other_loss
FROM prompts p
LEFT JOIN prompts o ON o.run_id = $other_run AND o.prompt_id = p.prompt_id
WHERE p.run_id = $run
ORDER BY p.prompt_id;
