{
  description = "Fused Triton kernels for the Qwen3 MoE block";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    {
      self,
      kernel-builder,
    }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
      # Packages the `kernels_ci` tests need beyond torch, pytest and kernels
      # (the model-level tests load tiny Qwen3 MoE checkpoints with PEFT adapters).
      pythonCheckInputs =
        ps: with ps; [
          transformers
          peft
          safetensors
        ];
    };
}
