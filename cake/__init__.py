"""cake: distributed Llama 3 inference over the machines you already own."""

__version__ = "0.1.0"
