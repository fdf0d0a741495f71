"""The shapes demo, the application on the embedded default: `unclip-jax demo` trains a
miniature stack on the procedural shapes world (`run`), measures it (`evaluate`, with the
deterministic image reader `analyse`) and writes its report (`report`). The library does not
import this package."""
