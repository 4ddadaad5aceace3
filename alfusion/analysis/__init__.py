"""Looking inside runs: layer attention, per-layer probes, CKA, and paper-style reports."""
