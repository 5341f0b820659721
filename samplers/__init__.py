"""How the next token or latent is drawn."""
