"""ebpfrouter."""
