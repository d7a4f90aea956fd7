"""Where models come from: the built-in default pair (`default_pair`), the catalog of
real pairs (`catalog`), downloads from the hub (`hub`), names to files (`resolve`), and
prompt/response files (`datafiles`).
"""
