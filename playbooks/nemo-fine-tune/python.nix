# NeMo AutoModel's Python: the CUDA set's torch, triton and NVIDIA libraries (overlays/cuda-wheels.nix)
# and, beside them, the wheels NeMo AutoModel 0.7.0 needs at its own versions (transformers 5.18.0,
# huggingface-hub, tokenizers, megatron-fsdp, flashoptim, quack-kernels, nvidia-cutlass-dsl, torchao,
# torchdata, mistral-common, tiktoken, nemo-automodel ...). No AutoModel release fits the
# pytorch-fine-tune set (its transformers 5.5.4 is too old), so these are a set of their own, used only
# by this shell's Python.
#
# The wheels are pinned by ./wheels/cp314-<system>.json (URL, sha256, Requires-Dist), made from PyPI at
# ./constraints.txt (the versions the CPU venv test runs) by
#   python overlays/cuda-wheels/update.py --set nemo --verify
# which recomputes every hash from the downloaded file. Each wheel is installed as nixpkgs' torch-bin
# is: format = "wheel", fetchurl, autoPatchelfHook. A requirement the manifest lacks is one the CUDA
# set already has (torch, triton, numpy, sympy ...): that package is taken from `python3.pkgs`, so the
# environment holds one of each.
#
# Called with callPackage from the CUDA nixpkgs (overlays.default + overlays.cuda-wheels). With
# `cpuOnly = true`, from the CPU nixpkgs, for the flake's CPU check: nixpkgs' CPU torch instead, and the
# CUDA-only requirements (below) left out.
{
  lib,
  python3,
  fetchurl,
  autoPatchelfHook,
  stdenv,
  zlib,
  cpuOnly ? false,
}:
let
  inherit (stdenv.hostPlatform) system;
  file = ./wheels + "/cp${lib.replaceStrings [ "." ] [ "" ] python3.pythonVersion}-${system}.json";
  manifest =
    if builtins.pathExists file then
      lib.importJSON file
    else
      throw "playbooks/nemo-fine-tune: no wheel manifest for python${python3.pythonVersion} on ${system}; make one with overlays/cuda-wheels/update.py --set nemo";

  own = name: manifest.wheels ? ${name};
  fromCudaSet = name: !(own name);
  # On the CPU: neither the CUDA-only wheels (quack-kernels' CUTLASS DSL, cuda-python, triton) nor a
  # requirement no CPU set has; AutoModel imports and its CPU check runs without them.
  cudaOnly = name: builtins.match "triton|cuda-.*|nvidia-.*" name != null;
  available = name: !cpuOnly || (!cudaOnly name && (own name || python3.pkgs ? ${name}));

  # NixOS links the driver's libraries here; elsewhere the shell's host-driver link provides them.
  driverLib = "/run/opengl-driver/lib";

  wheel =
    pkgs: name: spec:
    python3.pkgs.buildPythonPackage {
      pname = name;
      inherit (spec) version;
      format = "wheel";
      src = fetchurl { inherit (spec) url hash; };

      dependencies = map (dep: if own dep then pkgs.${dep} else python3.pkgs.${dep}) (
        lib.filter available spec.dependencies
      );
      # The CUDA set's packages are nixpkgs' versions (numpy, fsspec ...), not the ones pip paired with
      # this set: their exact versions are the CUDA set's to choose.
      pythonRelaxDeps = lib.filter (dep: fromCudaSet dep && available dep) spec.dependencies;
      pythonRemoveDeps = lib.filter (dep: !available dep) spec.dependencies;

      # Compiled wheels (tokenizers, tiktoken, hf-xet, pyarrow, nvidia-cutlass-dsl's MLIR libraries ...)
      # link libstdc++, libgcc_s and zlib; the driver is found at run time, never pinned.
      nativeBuildInputs = [ autoPatchelfHook ];
      buildInputs = [
        (lib.getLib stdenv.cc.cc)
        zlib
      ];
      autoPatchelfIgnoreMissingDeps = [ "libcuda.so.1" ];
      appendRunpaths = [ driverLib ];
      dontStrip = true;

      passthru = {
        inherit (spec) size;
        wheel = baseNameOf spec.url;
      };

      meta = {
        description = "${name} ${spec.version}, PyPI's wheel (NeMo AutoModel's set)";
        homepage = "https://pypi.org/project/${name}/${spec.version}/";
        sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
        platforms = [ system ];
      };
    };

  packages = lib.fix (pkgs: lib.mapAttrs (wheel pkgs) manifest.wheels);
  withPackages = f: python3.withPackages (ps: [ packages.nemo-automodel ] ++ f ps);
in
{
  inherit packages;
  # nemo-automodel pulls in the rest through its dependencies; `withPackages` adds nixpkgs' (pytest).
  # NVIDIA's QLoRA recipe loads the model in 4-bit with bitsandbytes, an optional extra of AutoModel's:
  # the CUDA set's wheel, the pytorch-fine-tune shell's.
  python = withPackages (ps: lib.optional (!cpuOnly) ps.bitsandbytes);
  inherit withPackages;
  # What a first `nix develop` downloads for this set, beyond the CUDA set.
  downloadBytes = lib.foldl' builtins.add 0 (lib.mapAttrsToList (_: spec: spec.size) manifest.wheels);
}
