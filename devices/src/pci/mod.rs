//! PCI: the root bus, configuration space, MSI-X and the virtio-pci transport.
