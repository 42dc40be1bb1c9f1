# torch, triton, bitsandbytes and the NVIDIA CUDA 13 libraries torch's wheel requires, from PyPI's
# binary wheels: a CUDA Python set in which nothing is compiled, for the CUDA devShells.
#
# Why: no binary cache holds nixpkgs' CUDA torch for aarch64-linux (DGX Spark), so there it is
# compiled with nvcc, for hours; PyPI's torch 2.13.0 Linux wheels are CUDA 13.0 builds for x86_64
# and aarch64 alike.
#
# The wheels are pinned by one manifest per system and Python, ./cuda-wheels/cp314-<system>.json,
# made from the registry by ./cuda-wheels/update.py: each wheel's URL, sha256, size and the names it
# needs (its Requires-Dist on that system, with the extras others ask of it). Each wheel becomes a
# Python package the way nixpkgs' torch-bin and triton-bin are made
# (pkgs/development/python-modules/torch/bin/default.nix, triton/bin.nix): format = "wheel",
# fetchurl with the manifest's url and hash, autoPatchelfHook. A wheel's NVIDIA dependencies are
# Python packages too (so torch's Requires-Dist is met, and checked at build time), and their
# libraries (site-packages/nvidia/...) are on autoPatchelf's search path. The driver (libcuda.so.1)
# is not pinned: it comes from /run/opengl-driver/lib (NixOS, added to every library's RUNPATH, as
# addDriverRunpath does) or from the shell's host-driver link (LD_LIBRARY_PATH, ../playbooks/
# pytorch-fine-tune/host-driver.sh). CUDA 13 needs an NVIDIA driver >= 580.
#
# Use it after overlays.default, in a nixpkgs imported with (import ./cuda.nix).nixpkgsConfig
# { wheels = true; }: CPU nixpkgs (every other package is nixpkgs' cached CPU build) with NVIDIA's
# unfree libraries allowed. It changes, in every Python package set (pythonPackagesExtensions):
#   torch, triton, bitsandbytes   the wheels; so do accelerate, peft, trl and llm-finetune, which
#                                 depend on them (pure Python, built against the wheel torch)
#   cuda-*, nvidia-*              the CUDA libraries, one package per wheel
# and adds llm-finetune-cuda: what the shells' help says (the CUDA release, the driver it needs,
# what is downloaded).
final: prev:
let
  inherit (prev) lib;

  # The CUDA release of the wheels (torch.version.cuda) and the oldest driver that runs it
  # (NVIDIA's CUDA 13.0 release notes: >= 580).
  cudaVersion = "13.0";
  minimumDriver = "580";

  # NixOS links the driver's libraries here (nixpkgs' addDriverRunpath.driverLink + "/lib").
  driverLib = "/run/opengl-driver/lib";

  manifestDir = ./cuda-wheels;
  manifestFile =
    python: system:
    manifestDir + "/cp${lib.replaceStrings [ "." ] [ "" ] python.pythonVersion}-${system}.json";

  # Every package name any manifest has, so that the set's attribute names are known without
  # reading this system's manifest (a missing one fails only where a wheel is used).
  allNames = lib.unique (
    lib.concatMap (file: lib.attrNames (lib.importJSON (manifestDir + "/${file}")).wheels) (
      lib.filter (lib.hasSuffix ".json") (lib.attrNames (builtins.readDir manifestDir))
    )
  );

  # The driver: found at run time (see above), never pinned. torch links to it directly.
  notPinned = [ "libcuda.so.1" ];

  wheels =
    pyfinal: _pyprev:
    let
      inherit (pyfinal) python;
      inherit (final.stdenv.hostPlatform) system;
      file = manifestFile python system;
      manifest =
        if builtins.pathExists file then
          lib.importJSON file
        else
          throw "overlays/cuda-wheels: no wheel manifest for python${python.pythonVersion} on ${system} (${baseNameOf file}); make one with overlays/cuda-wheels/update.py";

      isWheel = name: manifest.wheels ? ${name};
      wheelDeps = name: lib.filter isWheel manifest.wheels.${name}.dependencies;

      # The wheels `name` needs, directly or through others (torch -> cuda-toolkit -> cuBLAS).
      wheelClosure =
        name:
        map (item: item.key) (
          builtins.genericClosure {
            startSet = [ { key = name; } ];
            operator = item: map (key: { inherit key; }) (wheelDeps item.key);
          }
        );

      fromWheel =
        name:
        let
          spec =
            if isWheel name then
              manifest.wheels.${name}
            else
              throw "overlays/cuda-wheels: ${baseNameOf file} has no ${name}";
          nvidiaDeps = map (dep: pyfinal.${dep}) (lib.remove name (wheelClosure name));
          # Where the wheel's own libraries are, and those of every wheel it needs.
          sitePackages = map (pkg: "${pkg}/${python.sitePackages}") (
            [ (placeholder "out") ] ++ nvidiaDeps
          );
          searchPath = dir: "addAutoPatchelfSearchPath \"${dir}\"\n";
          common = {
            pname = name;
            inherit (spec) version;
            format = "wheel";

            src = final.fetchurl { inherit (spec) url hash; };

            # Pure-Python requirements (sympy, jinja2, numpy ...) are nixpkgs' packages.
            dependencies = map (dep: pyfinal.${dep}) spec.dependencies;

            nativeBuildInputs = [ final.autoPatchelfHook ];
            # libstdc++ and libgcc_s.
            buildInputs = [ (lib.getLib final.stdenv.cc.cc) ] ++ (extra.${name}.libraries or [ ]);

            autoPatchelfIgnoreMissingDeps = notPinned ++ (extra.${name}.ignoreMissing or [ ]);
            appendRunpaths = [ driverLib ];
            # The implicit postFixup runs before autoPatchelf's hook, as in torch-bin.
            postFixup = lib.concatMapStrings searchPath sitePackages;

            # autoPatchelf keeps in a RUNPATH only the directories of the libraries the file links
            # to, but NVIDIA's libraries and torch also dlopen others by name (cuDNN its engines,
            # NVRTC its builtins, torch NVRTC: NixOS/nixpkgs#296179), and dlopen searches the
            # caller's RUNPATH. The wheels' RUNPATHs named them relative to site-packages ($ORIGIN,
            # $ORIGIN/../../nvidia/cu13/lib ...): give every ELF file each such directory of this
            # wheel and of the wheels it needs, like torch-bin's postPatchelfPhase.
            postPhases = [ "addNvidiaRunpathsPhase" ];
            addNvidiaRunpathsPhase = ''
              nvidiaDirs=$(find ${lib.escapeShellArgs sitePackages} \
                -type d -path '*/nvidia/*/lib' -printf '%p:')
              if [ -n "$nvidiaDirs" ]; then
                while IFS= read -r -d "" elf; do
                  if isELF "$elf"; then
                    patchelf --add-rpath "''${nvidiaDirs%:}" "$elf"
                  fi
                done < <(find "$out" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
              fi
            '';

            # Stripping breaks torch's libraries ("ELF load command address/offset not properly
            # aligned", nixpkgs' torch-bin).
            dontStrip = true;

            passthru = {
              inherit (spec) size;
              wheel = baseNameOf spec.url;
            }
            // (extra.${name}.passthru or { });

            meta = {
              description = "${name} ${spec.version}, PyPI's wheel (CUDA ${cudaVersion})";
              homepage = "https://pypi.org/project/${name}/${spec.version}/";
              # torch (BSD-3), triton (MIT) and bitsandbytes (MIT) bundle or link NVIDIA's
              # libraries; the cuda-*/nvidia-* wheels are under NVIDIA's license. Redistributable,
              # not free.
              license = [ lib.licenses.unfreeRedistributable ];
              sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
              platforms = [ system ];
            };
          };
        in
        pyfinal.buildPythonPackage (
          common
          // removeAttrs (extra.${name} or { }) [
            "ignoreMissing"
            "libraries"
            "passthru"
          ]
        );

      # What particular wheels need beyond the common recipe, from the libraries their ELF files
      # name (`readelf -d`, both systems' wheels) that no wheel provides:
      #   libraries       nixpkgs libraries to link them to (buildInputs)
      #   ignoreMissing   libraries only some machines have, loaded only there
      extra = {
        torch = {
          # zlib: the aarch64 wheel's.
          libraries = [ final.zlib ];
          pythonImportsCheck = [ "torch" ];
          # Like nixpkgs' torch: packages that build CUDA code against torch (torchvision ...) read
          # these. There is no nixpkgs cudaPackages behind this torch; such a package must come
          # from a wheel too.
          passthru = {
            cudaSupport = true;
            rocmSupport = false;
            cudaPackages = throw "the wheel torch (overlays/cuda-wheels.nix) has no nixpkgs cudaPackages: take CUDA packages built against it from wheels too";
          };
        };
        triton = {
          libraries = [ final.zlib ];
          pythonImportsCheck = [ "triton" ];
        };
        bitsandbytes = {
          # The wheel carries a library per CUDA release (libbitsandbytes_cuda118.so ... cuda130.so)
          # and loads the one matching torch.version.cuda, plus one for Intel GPUs (SYCL). Only CUDA
          # 13's libraries are here: keep its library and the CPU one.
          postInstall = ''
            find "$out/${python.sitePackages}/bitsandbytes" -name 'libbitsandbytes_*.so' \
              ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda13*.so' -delete
          '';
          pythonImportsCheck = [ "bitsandbytes" ];
          passthru.cudaSupport = true;
        };
        nvidia-cudnn-cu13.libraries = [ final.zlib ];
        # libcufile_rdma: GPUDirect Storage over InfiniBand (rdma-core).
        nvidia-cufile.ignoreMissing = [
          "libibverbs.so.1"
          "libmlx5.so.1"
          "librdmacm.so.1"
        ];
        # NVSHMEM's bootstrap and transport plugins for MPI, OpenSHMEM, PMIx, UCX, libfabric and
        # InfiniBand; torch links only to libnvshmem_host.
        nvidia-nvshmem-cu13.ignoreMissing = [
          "libfabric.so.1"
          "libmlx5.so.1"
          "libmpi.so.40"
          "liboshmem.so.40"
          "libpmix.so.2"
          "libucp.so.0"
          "libucs.so.0"
        ];
      };
    in
    lib.genAttrs allNames fromWheel;
in
{
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [ wheels ];

  llm-finetune-cuda =
    let
      manifest = manifestFile final.python3 final.stdenv.hostPlatform.system;
      sizes = lib.mapAttrsToList (_: wheel: wheel.size) (lib.importJSON manifest).wheels;
    in
    {
      description = "CUDA ${cudaVersion}, torch from PyPI's wheels";
      inherit cudaVersion minimumDriver;
      driver = ">= ${minimumDriver} (CUDA ${cudaVersion})";
      # What a first `nix develop` downloads for the CUDA wheels (the rest is nixpkgs' CPU cache).
      downloadBytes = lib.foldl' builtins.add 0 sizes;
    };
}
