-- Readable names over the tables, created with the schema. Plain DuckDB SQL: any client can use them.
-- node_label is generated from actwh/ontology.py's LABELS (tests/test_labels.py checks it is current):
--   python -c 'from actwh.ontology import node_label_sql; print(node_label_sql())'
CREATE OR REPLACE MACRO node_label(layer, node_type, node_index, token := NULL) AS
    CASE CAST(node_type AS VARCHAR)
        WHEN 'embed' THEN 'emb'
        WHEN 'attn_head' THEN 'L' || CAST(layer AS VARCHAR) || 'H' || CAST(node_index AS VARCHAR)
        WHEN 'mlp' THEN 'L' || CAST(layer AS VARCHAR) || '.mlp'
        WHEN 'mlp_neuron' THEN 'L' || CAST(layer AS VARCHAR) || 'N' || CAST(node_index AS VARCHAR)
        WHEN 'mlp_expert' THEN 'L' || CAST(layer AS VARCHAR) || 'E' || CAST(node_index AS VARCHAR)
        WHEN 'sae_latent' THEN 'L' || CAST(layer AS VARCHAR) || 'F' || CAST(node_index AS VARCHAR)
        WHEN 'sae_error' THEN 'L' || CAST(layer AS VARCHAR) || '.err'
        WHEN 'logit' THEN 'logit' || coalesce(':"' || token || '"', CASE WHEN node_index >= 0 THEN CAST(node_index AS VARCHAR) ELSE '' END)
        ELSE CAST(node_type AS VARCHAR) || CAST(layer AS VARCHAR) || '_' || CAST(node_index AS VARCHAR)
    END;
CREATE OR REPLACE VIEW nodes AS
    SELECT n.run_id, n.prompt_id, n.position, t.token, n.layer, n.node_type, n.node_index,
           node_label(n.layer, n.node_type, n.node_index) AS node_label, n.scalar, n.value
    FROM node_scalars n
    LEFT JOIN tokens t USING (run_id, prompt_id, position);
CREATE OR REPLACE VIEW pairs AS
    SELECT p.run_id, p.prompt_id, p.layer, p.head, node_label(p.layer, 'attn_head', p.head) AS node_label,
           p.query_pos, q.token AS query_token, p.key_pos, k.token AS key_token, p.scalar, p.value
    FROM pair_scalars p
    LEFT JOIN tokens q ON q.run_id = p.run_id AND q.prompt_id = p.prompt_id AND q.position = p.query_pos
    LEFT JOIN tokens k ON k.run_id = p.run_id AND k.prompt_id = p.prompt_id AND k.position = p.key_pos;
CREATE OR REPLACE VIEW edges_labeled AS
    SELECT e.*, node_label(e.up_layer, e.up_type, e.up_index) AS up_label,
           node_label(e.down_layer, e.down_type, e.down_index, token := p.target_token)
               || coalesce('.' || CAST(e.down_input AS VARCHAR), '') AS down_label
    FROM edges e
    LEFT JOIN prompts p ON p.run_id = e.run_id AND p.prompt_id = e.prompt_id;
CREATE OR REPLACE VIEW prompt_tokens AS
    SELECT run_id, prompt_id, string_agg(token, ' ' ORDER BY position) AS tokens, count(*) AS n_tokens
    FROM tokens GROUP BY run_id, prompt_id
