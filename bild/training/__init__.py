"""Training little models: teacher caches (`teacher`), losses (`losses`), held-out agreement (`evaluate`) and the
trainer (`trainer`). Imported only by the draft commands; inference never imports it."""
