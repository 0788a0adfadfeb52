"""The models' output stride, in a module without torch: params.yaml and model files are
checked against it by torch-free paths (onnxruntime predict) too."""

#: The decoder reads strides 4, 8, 16 and 32: inputs must be multiples of this.
OUTPUT_STRIDE = 32
