"""rayrec serving: a Predictor over an exported model and its Ray Serve deployment."""
