"""One module per pipeline stage; `registry.py` lists them, `runner.py` runs any of them."""
