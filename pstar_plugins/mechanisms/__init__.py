"""Method-independent mechanisms that know only the contract: attention routing, padding-free
packing, inputs, rotary positions, distributed gathering, adapter files and prompt templates."""
