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
# versions this overlay delivers.
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
      # nixpkgs already relaxes click; 1.31 also asks for hf-xet >= 1.5.2, which only matters for
      # downloads from Xet-backed repositories.
      pythonRelaxDeps = (old.pythonRelaxDeps or [ ]) ++ [ "hf-xet" ];
      meta = old.meta // {
        changelog = "https://github.com/huggingface/huggingface_hub/releases/tag/v${version}";
      };
    });

    # transformers 5.5.4 declares tokenizers <= 0.23.0; nixpkgs has tokenizers 0.23.2 (a patch
    # release of the same API). Rebuilding tokenizers at 0.23.0 would need a new cargo vendor hash,
    # so relax the bound instead, as nixpkgs does for such caps.
    transformers = pyprev.transformers.overridePythonAttrs (old: {
      pythonRelaxDeps = (old.pythonRelaxDeps or [ ]) ++ [ "tokenizers" ];
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
        narrowed = (final.config.cudaCapabilities or null) != null;
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
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [ fixes ];
}
