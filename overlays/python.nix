# Python package fixes for the pinned nixpkgs, and this project's own package.
#
# One Python everywhere: nixpkgs' `python3` (python314 at the pinned revision, all-packages.nix
# `python3 = python314`). The fixes go into `pythonPackagesExtensions`, so they apply to
# `python3.pkgs` whichever nixpkgs instance (CPU or CUDA) the devShells, packages and checks use.
#
# What nixpkgs ships at the pinned revision (newest stored version of each
# pkgs/development/python-modules/<name>/default.nix): torch 2.13.0, transformers 5.5.4, trl 0.25.1,
# peft 0.18.0, accelerate 1.12.0, datasets 5.1.0, bitsandbytes 0.48.2, huggingface-hub 1.28.0,
# tokenizers 0.23.2, safetensors 0.8.0, tensorboard 2.21.0, pyyaml 6.0.3. constraints.txt lists the
# versions this overlay delivers. tests/nix/nixpkgs-stub models that set, with nixpkgs' build-time
# checks (runtime dependencies against each release's Requires-Dist), for tests/test_flake.py.
final: prev:
let
  inherit (final) lib;

  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);

  # "transformers>=5.5,<6; python_version >= '3.11'" -> "transformers" (PEP 503 normalised), which
  # is also the nixpkgs attribute name for every dependency this project has.
  requirementName =
    spec:
    let
      m = builtins.match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*).*" spec;
    in
    if m == null then
      throw "cannot read a package name from the requirement '${spec}' in pyproject.toml"
    else
      lib.toLower (builtins.replaceStrings [ "_" "." ] [ "-" "-" ] (builtins.head m));

  # pythonRelaxDeps is a list of names, or `true` for all of them (nixpkgs allows both): change the
  # list without turning a `true` into a type error.
  relaxDeps =
    old: change:
    let
      current = old.pythonRelaxDeps or [ ];
    in
    if current == true then true else change current;

  # hf-xet from PyPI's manylinux wheels (Rust inside, statically linked but for glibc and libgcc_s).
  # Only used where nixpkgs' own hf-xet is older than huggingface-hub asks for: building a newer one
  # from source would need a cargo vendor hash, which only a Nix build with network can compute.
  # Hashes: sha256 of each wheel as published on PyPI; recompute with
  #   pip download --no-deps --only-binary=:all: --python-version 3.14 --implementation cp \
  #     --platform manylinux_2_17_x86_64 (or manylinux_2_28_aarch64) hf-xet==1.8.0
  #   nix hash file --type sha256 --sri hf_xet-1.8.0-*.whl
  hfXetWheels = {
    x86_64-linux = {
      url = "https://files.pythonhosted.org/packages/f8/1e/1e8ecc05ef034e9a95c18ed32d2ec07905a7cd2ca611a9d88e25ee1f4850/hf_xet-1.8.0-cp38-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl";
      hash = "sha256-Kdq3yQTNGRSgQ5xuEwbBLHSXyL0yKQ++Vj6/UcpLbW0=";
    };
    aarch64-linux = {
      url = "https://files.pythonhosted.org/packages/35/c4/127a1548df019ea4c80f06e685f263e146075143335a02e78a3c41dbc4eb/hf_xet-1.8.0-cp38-abi3-manylinux_2_28_aarch64.whl";
      hash = "sha256-iADjREdw8sYws2G8bVxuu3cLeDBkbPYy+7edDlu8nn8=";
    };
  };

  # The packages that depend on huggingface-hub and so are rebuilt on the user's machine once it is
  # overridden (they are no longer the ones the binary caches hold). Their test suites would run
  # there too: accelerate's whole `tests` directory, for one, slow and occasionally flaky, so that
  # one upstream test could break `nix develop`. They are nixpkgs' packages, tested by nixpkgs;
  # doCheck = false skips only the test suites: pythonImportsCheck and the runtime-dependency check
  # are not part of the check phase and still run.
  rebuiltByTheHub = [
    "tokenizers"
    "transformers"
    "datasets"
    "accelerate"
    "peft"
    "trl"
  ];

  fixes = pyfinal: pyprev: {
    # datasets 5.1.0 requires huggingface-hub >= 1.31; nixpkgs has 1.28.0, with which
    # `import datasets` fails (cannot import name 'httpx' from 'huggingface_hub.utils') and so does
    # datasets' own pythonImportsCheck. 1.31.0 has the same dependencies as 1.28.0 (click, filelock,
    # fsspec, hf-xet, httpx, packaging, pyyaml, tqdm, typing-extensions).
    # Hash: sha256 of huggingface_hub-1.31.0.tar.gz as published on PyPI.
    huggingface-hub = pyprev.huggingface-hub.overridePythonAttrs (old: rec {
      version = "1.31.0";
      src = pyfinal.fetchPypi {
        pname = "huggingface_hub";
        inherit version;
        hash = "sha256-+OnnEKIQYT+l0PJrum2gXvSu+fuloPI/UI9axNCLb5A=";
      };
      # nixpkgs relaxes click. Not hf-xet: 1.31 needs hf-xet >= 1.5.2 to download from Xet-backed
      # repositories (Llama's included), so the bound is met below instead of hidden.
      pythonRelaxDeps = relaxDeps old (lib.remove "hf-xet");
      meta = old.meta // {
        changelog = "https://github.com/huggingface/huggingface_hub/releases/tag/v${version}";
      };
    });

    # huggingface-hub 1.31 requires hf-xet >= 1.5.2, < 2 (its Requires-Dist on x86_64 and aarch64).
    hf-xet =
      if lib.versionAtLeast pyprev.hf-xet.version "1.5.2" then
        pyprev.hf-xet
      else
        pyfinal.buildPythonPackage {
          pname = "hf-xet";
          version = "1.8.0";
          format = "wheel";
          src = final.fetchurl (
            hfXetWheels.${final.stdenv.hostPlatform.system}
              or (throw "hf-xet: no wheel for ${final.stdenv.hostPlatform.system}")
          );
          nativeBuildInputs = [ final.autoPatchelfHook ];
          buildInputs = [ (lib.getLib final.stdenv.cc.cc) ];
          pythonImportsCheck = [ "hf_xet" ];
          meta = {
            description = "Xet client tech, used in huggingface_hub (PyPI wheel)";
            homepage = "https://github.com/huggingface/xet-core";
            license = lib.licenses.asl20;
            sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
            platforms = builtins.attrNames hfXetWheels;
          };
        };

    # transformers 5.5.4 declares tokenizers <= 0.23.0; nixpkgs has tokenizers 0.23.2 (a patch
    # release of the same API). Rebuilding tokenizers at 0.23.0 would need a new cargo vendor hash,
    # so relax the bound instead, as nixpkgs does for such caps.
    transformers = pyprev.transformers.overridePythonAttrs (old: {
      pythonRelaxDeps = relaxDeps old (names: names ++ [ "tokenizers" ]);
    });

    # With transformers 5.5, nixpkgs' trl 0.25.1 cannot import DPOTrainer (transformers 5 returns a
    # tuple from an availability check that trl reads as true, then imports mergekit; its trainers also
    # write PreTrainedModel.warnings_issued, which transformers 5 removed), and 0.26-0.28 fail too
    # (weave). 0.29.1, the newest patch release of the first series that works, runs DPO and SFT on
    # transformers 5.5.4 as is. It requires accelerate >= 1.4.0, datasets >= 3.0.0, packaging > 20.0
    # and transformers >= 4.56.2, all in nixpkgs at newer versions (rich is no longer needed); the
    # sdist builds with setuptools >= 77.0.3 and takes its version from its VERSION file.
    # Hash: sha256 of trl-0.29.1.tar.gz as published on PyPI.
    trl = pyprev.trl.overridePythonAttrs (old: rec {
      version = "0.29.1";
      src = pyfinal.fetchPypi {
        pname = "trl";
        inherit version;
        hash = "sha256-Et9aoi0d6yaULK/fTP119T1xQZQucMTcCWZoejYXgTs=";
      };
      dependencies = (old.dependencies or [ ]) ++ [ pyfinal.packaging ];
      meta = old.meta // {
        changelog = "https://github.com/huggingface/trl/releases/tag/v${version}";
      };
    });

    # nixpkgs' bitsandbytes follows torch: `cudaSupport ? torch.cudaSupport` and
    # `cudaPackages ? torch.cudaPackages`, both in passthru. It builds for bitsandbytes' own default
    # architecture list; when a preset narrows `config.cudaCapabilities`, build exactly those, like
    # torch. (CMake variable COMPUTE_CAPABILITY, "Separate by semicolons, i.e. 89;90;100;120",
    # bitsandbytes' CMakeLists.txt; the string comes from cudaPackages.flags, as llama-cpp uses it.)
    # Without a preset the package is left alone, so it still comes from the binary cache.
    bitsandbytes =
      let
        inherit (pyprev) bitsandbytes;
        # nixpkgs' config.cudaCapabilities is an option whose default is [ ] ("use the CUDA
        # release's default list"), never null or absent.
        narrowed = (final.config.cudaCapabilities or [ ]) != [ ];
        architectures = bitsandbytes.cudaPackages.flags.cmakeCudaArchitecturesString;
      in
      if (bitsandbytes.cudaSupport or false) && narrowed then
        bitsandbytes.overridePythonAttrs (old: {
          cmakeFlags = (old.cmakeFlags or [ ]) ++ [
            (lib.cmakeFeature "COMPUTE_CAPABILITY" architectures)
          ];
        })
      else
        bitsandbytes;

    # This project's Python package: the `finetune` library under scripts/ (setuptools,
    # package-dir "" = "scripts", package data finetune/assets/*). Dependencies come from pyproject.toml, so it stays the one list;
    # a name nixpkgs does not have fails evaluation here rather than at run time.
    llm-finetune = pyfinal.buildPythonPackage {
      pname = "llm-finetune";
      version = pyproject.project.version or "0.0.0";
      pyproject = true;

      src = lib.fileset.toSource {
        root = ../.;
        fileset = lib.fileset.unions [
          ../pyproject.toml
          ../scripts
          # pyproject.toml's `readme`; setuptools reads it while building.
          ../README.md
        ];
      };

      build-system = map (spec: pyfinal.${requirementName spec}) (
        pyproject.build-system.requires or [ "setuptools" ]
      );
      dependencies = map (spec: pyfinal.${requirementName spec}) (
        pyproject.project.dependencies or [ ]
      );

      # The library imports cleanly without a GPU; the tests run in checks.<system>.pytest.
      pythonImportsCheck = [ "finetune" ];

      passthru = {
        # The `test` extra (pytest), for the devShells and checks.
        testDependencies = map (spec: pyfinal.${requirementName spec}) (
          pyproject.project.optional-dependencies.test or [ "pytest" ]
        );
      };

      meta.description = pyproject.project.description or "Fine-tuning playbook scripts for LLMs";
    };
  };
in
{
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
    fixes
    # After `fixes`, so that it also covers the packages `fixes` changes (transformers, trl).
    (
      pyfinal: pyprev:
      lib.genAttrs rebuiltByTheHub (name: pyprev.${name}.overridePythonAttrs { doCheck = false; })
    )
  ];
}
