"""SuperLink / SuperNode launchers and the thin Flower App (certificates and node keys: fedpeft.certs)."""
