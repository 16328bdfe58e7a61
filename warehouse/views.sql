-- Readable names over the tables, created with the schema. Plain DuckDB SQL: any client can use them.
CREATE OR REPLACE MACRO node_label(layer, node_type, node_index) AS
    CASE CAST(node_type AS VARCHAR)
        WHEN 'attn_head' THEN 'L' || layer || 'H' || node_index
        WHEN 'mlp_neuron' THEN 'L' || layer || 'N' || node_index
        WHEN 'mlp' THEN 'L' || layer || '.mlp'
        WHEN 'embed' THEN 'emb'
        WHEN 'sae_latent' THEN 'L' || layer || 'F' || node_index
        WHEN 'sae_error' THEN 'L' || layer || '.err'
        WHEN 'logit' THEN 'logit'
        WHEN 'resid' THEN 'L' || layer || '.resid'
        ELSE CAST(node_type AS VARCHAR) || layer || '_' || node_index
    END;
CREATE OR REPLACE VIEW nodes AS
    SELECT n.run_id, n.prompt_id, n.position, t.token, n.layer, n.node_type, n.node_index,
           node_label(n.layer, n.node_type, n.node_index) AS node_label, n.scalar, n.value
    FROM node_scalars n
    LEFT JOIN tokens t USING (run_id, prompt_id, position);
CREATE OR REPLACE VIEW pairs AS
    SELECT p.run_id, p.prompt_id, p.layer, p.head, 'L' || p.layer || 'H' || p.head AS node_label,
           p.query_pos, q.token AS query_token, p.key_pos, k.token AS key_token, p.scalar, p.value
    FROM pair_scalars p
    LEFT JOIN tokens q ON q.run_id = p.run_id AND q.prompt_id = p.prompt_id AND q.position = p.query_pos
    LEFT JOIN tokens k ON k.run_id = p.run_id AND k.prompt_id = p.prompt_id AND k.position = p.key_pos;
CREATE OR REPLACE VIEW edges_labeled AS
    SELECT e.*, node_label(e.up_layer, e.up_type, e.up_index) AS up_label,
           node_label(e.down_layer, e.down_type, e.down_index)
               || coalesce('.' || CAST(e.down_input AS VARCHAR), '') AS down_label
    FROM edges e;
CREATE OR REPLACE VIEW prompt_tokens AS
    SELECT run_id, prompt_id, string_agg(token, ' ' ORDER BY position) AS tokens, count(*) AS n_tokens
    FROM tokens GROUP BY run_id, prompt_id
