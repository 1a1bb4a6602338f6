"""The public data sets the benchmarks and examples read, one file each (like nanochat's ``tasks/``).

Each module says where its data is found (``common.find_dataset``: an explicit path, else
``$FEWTUNE_SHARED_DATA``, else ``../shared/data`` beside the repository or the working
directory), fails with the places it looked when the data is missing, and converts the
data set's own files into fewtune records. The data is read in place, never copied.
"""
