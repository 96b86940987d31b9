"""fusedisk: live storage relocation for VM disks, as a FUSE datastore."""

from . import fuseshim

# Before anything imports pyfuse3 (see fuseshim.py).
fuseshim.load()

__version__ = "0.1.0"
