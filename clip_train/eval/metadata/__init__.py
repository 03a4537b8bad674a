"""Data files for evaluation (class names and zero-shot templates); a package so that they ship."""
