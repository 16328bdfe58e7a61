-- name: faithfulness_curve
-- A faithfulness curve: mean faithfulness over prompts per circuit, smallest circuit first (one evaluation: eval, or the latest of run, method and baseline).
-- params: eval = NULL, run = NULL, method = 'influence', baseline = 'corrupt'
WITH chosen AS (
    SELECT coalesce(CAST($eval AS INTEGER),
                    (SELECT max(eval_id) FROM circuit_evals
                     WHERE run_id = CAST($run AS INTEGER) AND method = $method
                       AND baseline = $baseline)) AS eval_id
)
SELECT eval_id, run_id, method, baseline, selection, count(*) AS n_prompts,
       avg(n_edges) AS mean_edges, avg(n_nodes) AS mean_nodes, avg(metric) AS mean_metric,
       avg(faithfulness) AS faithfulness, min(faithfulness) AS min_faithfulness,
       max(faithfulness) AS max_faithfulness
FROM circuit_evals
WHERE eval_id = (SELECT eval_id FROM chosen)
GROUP BY eval_id, run_id, method, baseline, selection
ORDER BY mean_edges, mean_nodes, faithfulness, selection;

-- name: smallest_circuit
-- Per prompt, the smallest evaluated circuit whose faithfulness reaches level (one evaluation: eval, or the latest of run, method and baseline).
-- params: level = 0.8, eval = NULL, run = NULL, method = 'influence', baseline = 'corrupt'
WITH chosen AS (
    SELECT coalesce(CAST($eval AS INTEGER),
                    (SELECT max(eval_id) FROM circuit_evals
                     WHERE run_id = CAST($run AS INTEGER) AND method = $method
                       AND baseline = $baseline)) AS eval_id
)
SELECT prompt_id, selection, n_edges, n_nodes, metric, faithfulness
FROM circuit_evals
WHERE eval_id = (SELECT eval_id FROM chosen) AND faithfulness >= $level
QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY n_edges, faithfulness DESC) = 1
ORDER BY prompt_id;

-- name: method_auc
-- Methods (each run's edge scores × circuit selection, latest evaluation of each) ranked by the mean area under their faithfulness curves, x = the fraction of the graph's edges kept, on the prompts every one of them evaluated.
-- params: baseline = 'corrupt'
WITH latest AS (
    SELECT max(eval_id) AS eval_id FROM circuit_evals
    WHERE baseline = $baseline AND method <> 'nodes' GROUP BY run_id, method
), e AS (
    SELECT c.* FROM circuit_evals c JOIN latest USING (eval_id)
), common AS (  -- prompts every compared evaluation has, with a defined faithfulness throughout
    SELECT prompt_id FROM e GROUP BY prompt_id
    HAVING count(DISTINCT eval_id) = (SELECT count(*) FROM latest)
       AND count(*) FILTER (WHERE faithfulness IS NULL) = 0
), pts AS (
    SELECT eval_id, run_id, method, prompt_id, faithfulness AS y,
           n_edges / max(n_edges) OVER (PARTITION BY eval_id, prompt_id) AS x
    FROM e WHERE prompt_id IN (SELECT prompt_id FROM common)
), seg AS (
    SELECT *, lag(x) OVER w AS x0, lag(y) OVER w AS y0
    FROM pts WINDOW w AS (PARTITION BY eval_id, prompt_id ORDER BY x, y)
), per_prompt AS (
    SELECT eval_id, run_id, method, prompt_id,
           sum(coalesce((x - x0) * (y + y0) / 2, 0)) AS auc
    FROM seg GROUP BY eval_id, run_id, method, prompt_id
)
SELECT rank() OVER (ORDER BY avg(p.auc) DESC) AS rank,
       coalesce(json_extract_string(r.options, '$.edges.method'), 'edges?') || ' ' || p.method
           AS scoring,
       p.run_id, p.eval_id, count(*) AS n_prompts, avg(p.auc) AS auc,
       min(p.auc) AS min_auc, max(p.auc) AS max_auc
FROM per_prompt p JOIN runs r USING (run_id)
GROUP BY p.run_id, p.eval_id, p.method, r.options
ORDER BY rank, p.run_id, p.method;

-- name: verify_agreement
-- Predicted against measured effects per predictor (node scalar or edge method): correlation, sign agreement, mean |error| (one `actwh verify`: eval, or the run's latest).
-- params: eval = NULL, run = NULL
WITH chosen AS (
    SELECT coalesce(CAST($eval AS INTEGER),
                    (SELECT max(eval_id) FROM evaluations
                     WHERE run_id = CAST($run AS INTEGER)
                       AND json_extract_string(options, '$.kind') = 'verify')) AS eval_id
), effects AS (
    SELECT eval_id, run_id, scalar AS predictor, baseline, predicted, measured FROM node_effects
    UNION ALL
    SELECT eval_id, run_id, method AS predictor, baseline, predicted, measured FROM edge_effects
)
SELECT eval_id, run_id, predictor, baseline, count(*) AS n,
       corr(predicted, measured) AS correlation,
       avg(CASE WHEN sign(predicted) = sign(measured) THEN 1.0 ELSE 0.0 END) AS sign_agreement,
       avg(abs(predicted - measured)) AS mean_abs_error
FROM effects
WHERE eval_id = (SELECT eval_id FROM chosen)
GROUP BY eval_id, run_id, predictor, baseline
ORDER BY predictor;

-- name: stored_circuit
-- The edges of a stored circuit (`actwh circuit ... --save`), by its id: labels, the downstream input and the (mean) value it was kept with.
-- params: circuit
WITH e AS (
    SELECT c.circuit_id, c.run_id, c.method, unnest(from_json(c.edges::VARCHAR,
        '[{"up_layer": "INTEGER", "up_type": "VARCHAR", "up_index": "INTEGER", "down_layer": "INTEGER", "down_type": "VARCHAR", "down_index": "INTEGER", "down_input": "VARCHAR", "value": "DOUBLE"}]')) AS x
    FROM circuits c
    WHERE c.circuit_id = $circuit
)
SELECT circuit_id, run_id, method,
       node_label(x.up_layer, x.up_type, x.up_index) AS up_label,
       node_label(x.down_layer, x.down_type, x.down_index) AS down_label,
       x.down_input AS down_input, x.value AS value,
       x.up_layer AS up_layer, x.up_type AS up_type, x.up_index AS up_index,
       x.down_layer AS down_layer, x.down_type AS down_type, x.down_index AS down_index
FROM e
ORDER BY abs(x.value) DESC, up_layer, up_index, down_layer, down_index, down_input;
