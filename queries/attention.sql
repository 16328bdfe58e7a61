-- name: attention_pattern
-- Attention pattern of one head for one prompt: every stored query/key pair with its tokens.
-- params: run, prompt, layer, head
SELECT query_pos, query_token, key_pos, key_token, value AS attention
FROM pairs
WHERE run_id = $run AND prompt_id = $prompt AND layer = $layer AND head = $head
  AND scalar = 'attn_pattern'
ORDER BY query_pos, key_pos;

-- name: induction_heads
-- Heads that attend from a repeated token to the token after its earlier occurrence (induction score, mean over query positions that have one).
-- params: run, min_score = 0.0, k = 20
WITH pattern AS (
    SELECT p.prompt_id, p.layer, p.head, p.query_pos, p.key_pos, p.value
    FROM pair_scalars p
    WHERE p.run_id = $run AND p.scalar = 'attn_pattern'
), targets AS (
    -- (query q, key k) where the token before k equals the token at q, earlier in the prompt
    SELECT q.prompt_id, q.position AS query_pos, prev.position + 1 AS key_pos
    FROM tokens q
    JOIN tokens prev ON prev.run_id = q.run_id AND prev.prompt_id = q.prompt_id
        AND prev.token_id = q.token_id AND prev.position < q.position - 1
    WHERE q.run_id = $run
), per_query AS (
    SELECT pa.prompt_id, pa.layer, pa.head, pa.query_pos, sum(pa.value) AS score
    FROM pattern pa
    JOIN targets t ON t.prompt_id = pa.prompt_id AND t.query_pos = pa.query_pos AND t.key_pos = pa.key_pos
    GROUP BY ALL
)
SELECT layer, head, node_label(layer, 'attn_head', head) AS node_label, avg(score) AS induction_score,
       count(*) AS n_queries
FROM per_query
GROUP BY layer, head
HAVING avg(score) >= $min_score
ORDER BY induction_score DESC, layer, head
LIMIT $k;

-- name: previous_token_heads
-- Heads that attend from each token to the one just before it (mean attention to position q - 1 over stored query rows).
-- params: run, min_score = 0.0, k = 20
SELECT layer, head, node_label(layer, 'attn_head', head) AS node_label,
       avg(value) AS previous_token_score, count(*) AS n_queries
FROM pair_scalars
WHERE run_id = $run AND scalar = 'attn_pattern' AND query_pos >= 1 AND key_pos = query_pos - 1
GROUP BY layer, head
HAVING avg(value) >= $min_score
ORDER BY previous_token_score DESC, layer, head
LIMIT $k;
