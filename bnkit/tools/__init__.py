"""Model-level tools on the layers' public API: calibrate (PreciseBN), accumulate, freezing, convert,
fold, doctor, Keras interop. The public functions are re-exported from ``bnkit``."""
