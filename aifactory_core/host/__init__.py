"""The host model: the only code that reads the machine (sysfs, procfs) under a host root."""
