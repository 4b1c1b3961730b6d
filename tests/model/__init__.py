"""Model tests: CoCoMix operations against dense references, the whole model against a reference forward."""
