"""Drop-in APIs of other checkpointing libraries, backed by tierckpt."""
