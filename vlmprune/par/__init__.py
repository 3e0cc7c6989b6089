"""PAR: per-input visual-token and layer pruning with a meta-router (seed paper 003, METHODS.md s.6)."""
