"""fusedisk: live storage relocation for VM disks, as a FUSE datastore."""
__version__ = "0.1.0"
