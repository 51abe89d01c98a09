"""Weight quantization: grids (GGUF Q4_0/Q4_1/Q8_0), RTN, GPTQ and the layer-wise calibration driver."""
