"""Running on Ray: cluster start, quiet output, interrupts, the allocator setting, test hooks (may import Ray)."""
