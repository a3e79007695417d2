"""Training core shared by the tokenizer and the GPT: mesh, sharded state, optimizer, loop."""
