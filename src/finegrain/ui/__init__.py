"""`finegrain ui`: a dashboard in the browser for the runs under one directory.

Runs (status, scores), one run (config, live learning curves, report), a comparison of runs, a
playground that answers through the server's own engine (`finegrain.serve`), and a queue that
launches `finegrain train` in a subprocess. The page is plain HTML, CSS and JavaScript shipped in
`static/` (no build step, nothing fetched from the internet). Runs are read through
`finegrain.rundir` only; nothing here imports the training code.
"""
