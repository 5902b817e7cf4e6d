"""bpf_asm."""
