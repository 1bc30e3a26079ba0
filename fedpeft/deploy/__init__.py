"""SuperLink / SuperNode launchers, certificates, node keys and the thin Flower App."""
