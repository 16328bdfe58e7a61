CREATE TYPE node_type AS ENUM ('__node_types__');

CREATE TYPE scalar AS ENUM ('__scalars__');

CREATE TYPE down_input AS ENUM ('q', 'k', 'v');

CREATE TABLE actwh_meta (
	key VARCHAR NOT NULL, 
	value VARCHAR NOT NULL, 
	PRIMARY KEY (key)
);

CREATE TABLE models (
	model_id INTEGER NOT NULL, 
	name VARCHAR NOT NULL, 
	source VARCHAR NOT NULL, 
	weights_sha256 VARCHAR NOT NULL, 
	arch VARCHAR NOT NULL, 
	n_layers INTEGER NOT NULL, 
	n_heads INTEGER NOT NULL, 
	d_model INTEGER NOT NULL, 
	d_head INTEGER NOT NULL, 
	d_mlp INTEGER NOT NULL, 
	d_vocab INTEGER NOT NULL, 
	n_ctx INTEGER NOT NULL, 
	config JSON NOT NULL, 
	PRIMARY KEY (model_id)
);

CREATE TABLE saes (
	sae_id INTEGER NOT NULL, 
	model_id INTEGER NOT NULL, 
	site VARCHAR NOT NULL, 
	d_in INTEGER NOT NULL, 
	d_sae INTEGER NOT NULL, 
	source VARCHAR NOT NULL, 
	weights_sha256 VARCHAR NOT NULL, 
	config JSON NOT NULL, 
	PRIMARY KEY (sae_id)
);

CREATE TABLE runs (
	run_id INTEGER NOT NULL, 
	model_id INTEGER NOT NULL, 
	name VARCHAR, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	finished_at TIMESTAMP WITHOUT TIME ZONE, 
	status VARCHAR NOT NULL, 
	target VARCHAR NOT NULL, 
	scalars VARCHAR NOT NULL, 
	selection VARCHAR NOT NULL, 
	code_version VARCHAR NOT NULL, 
	device VARCHAR NOT NULL, 
	dtype VARCHAR NOT NULL, 
	n_prompts INTEGER NOT NULL, 
	options JSON NOT NULL, 
	PRIMARY KEY (run_id)
);

CREATE TABLE prompts (
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	text VARCHAR NOT NULL, 
	n_tokens INTEGER NOT NULL, 
	target_token_id INTEGER, 
	distractor_token_id INTEGER, 
	target_token VARCHAR, 
	metric DOUBLE, 
	loss DOUBLE, 
	corrupt_metric DOUBLE, 
	edges_to_target DOUBLE, 
	PRIMARY KEY (run_id, prompt_id)
);

CREATE TABLE batches (
	run_id INTEGER NOT NULL, 
	batch_id INTEGER NOT NULL, 
	n_prompts INTEGER NOT NULL, 
	n_node_rows BIGINT NOT NULL, 
	n_pair_rows BIGINT NOT NULL, 
	n_edge_rows BIGINT NOT NULL, 
	written_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (run_id, batch_id)
);

CREATE TABLE tokens (
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	token_id INTEGER NOT NULL, 
	token VARCHAR NOT NULL
);

CREATE TABLE node_scalars (
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	layer SMALLINT NOT NULL, 
	node_type node_type NOT NULL, 
	node_index INTEGER NOT NULL, 
	scalar scalar NOT NULL, 
	value REAL NOT NULL
);

CREATE TABLE pair_scalars (
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	layer SMALLINT NOT NULL, 
	head SMALLINT NOT NULL, 
	query_pos INTEGER NOT NULL, 
	key_pos INTEGER NOT NULL, 
	scalar scalar NOT NULL, 
	value REAL NOT NULL
);

CREATE TABLE edges (
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	up_layer SMALLINT NOT NULL, 
	up_type node_type NOT NULL, 
	up_index INTEGER NOT NULL, 
	up_pos INTEGER, 
	down_layer SMALLINT NOT NULL, 
	down_type node_type NOT NULL, 
	down_index INTEGER NOT NULL, 
	down_pos INTEGER, 
	down_input down_input, 
	value REAL NOT NULL
);

CREATE TABLE evaluations (
	eval_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	code_version VARCHAR NOT NULL, 
	options JSON NOT NULL, 
	PRIMARY KEY (eval_id)
);

CREATE TABLE circuit_evals (
	eval_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	method VARCHAR NOT NULL, 
	selection VARCHAR NOT NULL, 
	n_edges INTEGER NOT NULL, 
	n_nodes INTEGER NOT NULL, 
	baseline VARCHAR NOT NULL, 
	metric DOUBLE NOT NULL, 
	faithfulness DOUBLE
);

CREATE TABLE node_effects (
	eval_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	layer INTEGER NOT NULL, 
	node_type VARCHAR NOT NULL, 
	node_index INTEGER NOT NULL, 
	scalar VARCHAR NOT NULL, 
	baseline VARCHAR NOT NULL, 
	predicted DOUBLE NOT NULL, 
	measured DOUBLE NOT NULL
);

CREATE TABLE edge_effects (
	eval_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	prompt_id INTEGER NOT NULL, 
	up_layer INTEGER NOT NULL, 
	up_type VARCHAR NOT NULL, 
	up_index INTEGER NOT NULL, 
	down_layer INTEGER NOT NULL, 
	down_type VARCHAR NOT NULL, 
	down_index INTEGER NOT NULL, 
	down_input VARCHAR, 
	method VARCHAR NOT NULL, 
	baseline VARCHAR NOT NULL, 
	predicted DOUBLE NOT NULL, 
	measured DOUBLE NOT NULL
);

CREATE TABLE circuits (
	circuit_id INTEGER NOT NULL, 
	run_id INTEGER NOT NULL, 
	method VARCHAR NOT NULL, 
	params JSON NOT NULL, 
	prompts JSON NOT NULL, 
	n_edges INTEGER NOT NULL, 
	n_nodes INTEGER NOT NULL, 
	nodes JSON NOT NULL, 
	edges JSON NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (circuit_id)
);

