"""fio benchmarks that compare a raw backing store with a fusedisk mount.

Run ``python -m bench --help``. Job files live in ``bench/jobs/``; results go
to ``bench/results/`` unless ``--out`` says otherwise.
"""
