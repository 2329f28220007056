"""The control plane: everything that creates and steers jobs. No torch.

Its layers, top to bottom (checked by `lint-imports`):
- faces: `cli` (the command line's commands) and `api` (the HTTP API), parsing input and
  printing or serializing output;
- features: `plans`, `export`, `gallery`, then `submission` and `webhooks`;
- the batch layer (`batches`: look-up, counts, the job record, events, actions), beside
  `tenants` and `terminal_progress`.
"""
