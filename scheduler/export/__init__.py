"""`ipab export`: a batch's finished jobs as a dataset that the ML ecosystem loads.

One module per format (`imagefolder`, `webdataset`, `parquet`), each a writer that takes
samples (a PNG and its metadata columns) one at a time; `run` queries SQL, fetches the
PNGs from object storage, feeds the writer and keeps a small state file in the output so
that a second export adds only the jobs that finished since.
"""
