"""Names shared by every stage, in a module free of torch (the site imports it too)."""

LOGITS = "logits"  # the model's output, listed and stored as a layer
