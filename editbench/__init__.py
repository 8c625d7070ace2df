"""PIE-Bench editing evaluation: the benchmark's format (`pie.py`), PIE-tiny, a small benchmark in
that format rendered from sdlens-tiny's scenes (`tiny.py`), the paper's metrics (`metrics.py`) and
the runner (`run.py`)."""
