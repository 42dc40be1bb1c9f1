# LLaMA-Factory 0.9.5 in a Python set of its own, at LLaMA-Factory's pins. Evaluates to
# { python, source, version, llamafactory }: the Python environment with llamafactory-cli, the
# release source, and the package.
#
# LLaMA-Factory pins (its pyproject.toml at v0.9.5): transformers<=5.6.0, datasets<=4.0.0,
# accelerate<=1.11.0, peft<=0.18.1, trl<=0.24.0, gradio<=5.50.0, tyro<0.9.0, torchdata<=0.11.0,
# av<=16.0.0. This project's own set (overlays/python.nix) has newer datasets, accelerate and trl,
# and trl 0.29 moved names LLaMA-Factory imports, so it gets a set of its own: `python3.override`
# with the packages below replaced. Everything else is the very derivation the pytorch-fine-tune
# shell uses, since overlays.default and overlays.cuda-wheels extend every Python set
# (pythonPackagesExtensions, applied before packageOverrides): torch and bitsandbytes are PyPI's
# CUDA wheels in the CUDA shell and nixpkgs' CPU builds in the CPU one. The replacements are pure
# Python, so nothing compiled is rebuilt.
#
# torchvision and torchaudio: nixpkgs builds them against torch, compiling CUDA code with nvcc when
# torch has CUDA (the wheel torch has no nixpkgs CUDA toolkit to give them), so with a CUDA torch
# they are left out. LLaMA-Factory needs neither for text models; it imports torchaudio at module
# level (data/mm_plugin.py) to read audio inputs only, so that import gets ./no_torchaudio.py, a
# placeholder whose use raises an ImportError saying why. With the CPU torch they are nixpkgs'
# cached builds.
#
# Hashes: fetchPypi ones are the sha256 of the files PyPI publishes (`pip download --no-deps
# --no-binary :all: NAME==VERSION`, or `--only-binary :all:` for the wheels, then
# `nix hash file --type sha256 --sri FILE`); the LLaMA-Factory source's is `nix hash path` of
# `git archive v0.9.5` of github.com/hiyouga/LLaMA-Factory, unpacked (what fetchFromGitHub unpacks).
{
  lib,
  python3,
  fetchFromGitHub,
}:
let
  version = "0.9.5";

  # The release's source: the package, and the data/ and examples/ NVIDIA's commands read.
  source = fetchFromGitHub {
    owner = "hiyouga";
    repo = "LLaMA-Factory";
    tag = "v${version}";
    hash = "sha256-XQ0hdhey2rM9Em5HxdYqJ+xTs08dMePXt6wfP02N/PM=";
  };

  # An older release of a package nixpkgs has, from its PyPI sdist. The sdists carry no test suites
  # (nixpkgs builds these from GitHub and runs theirs), so the checks are LLaMA-Factory's smoke checks.
  olderRelease =
    pyfinal: package:
    {
      version,
      hash,
      overrides ? _: { },
    }:
    package.overridePythonAttrs (
      old:
      {
        inherit version;
        src = pyfinal.fetchPypi {
          inherit (package) pname;
          inherit version hash;
        };
        doCheck = false;
        meta = old.meta // {
          changelog = "https://pypi.org/project/${package.pname}/${version}/";
        };
      }
      // overrides old
    );

  # A pure-Python wheel from PyPI, for packages whose nixpkgs build needs more than a version bump
  # (gradio builds its web frontend with pnpm; the wheel ships it built).
  fromWheel =
    pyfinal:
    {
      pname,
      version,
      hash,
      dependencies,
      pythonRelaxDeps ? [ ],
      pythonRemoveDeps ? [ ],
      description,
    }:
    pyfinal.buildPythonPackage {
      inherit
        pname
        version
        dependencies
        pythonRelaxDeps
        pythonRemoveDeps
        ;
      format = "wheel";
      src = pyfinal.fetchPypi {
        pname = builtins.replaceStrings [ "-" ] [ "_" ] pname;
        inherit version hash;
        format = "wheel";
        dist = "py3";
        python = "py3";
      };
      pythonImportsCheck = [ (builtins.replaceStrings [ "-" ] [ "_" ] pname) ];
      meta.description = description;
    };

  pins = pyfinal: pyprev: {
    trl = olderRelease pyfinal pyprev.trl {
      version = "0.24.0";
      hash = "sha256-7uSVIjcl09oFlr4mB1gZaduJug98ALB1gCrdwx5h6sk=";
    };

    accelerate = olderRelease pyfinal pyprev.accelerate {
      version = "1.11.0";
      hash = "sha256-uxyvJZe0zWMrkXtQAMWR0QcwuwJKeXRvHuIFu6gL0ik=";
    };

    # datasets 4.0.0 caps dill (<0.3.9), multiprocess (<0.70.17) and fsspec (<=2025.3.0) below
    # nixpkgs' versions. fsspec is a dependency of torch, so pinning it would rebuild torch; these
    # are relaxed instead (the pip venv runs the capped versions).
    datasets = olderRelease pyfinal pyprev.datasets {
      version = "4.0.0";
      hash = "sha256-llfnFAqQUNsTRDuiHLXeGFr4r5REebAOf/HgCmHI2/E=";
      overrides = old: {
        # setup.py's REQUIRED_PKGS; aiohttp is fsspec's `http` extra.
        dependencies = with pyfinal; [
          aiohttp
          dill
          filelock
          fsspec
          huggingface-hub
          multiprocess
          numpy
          packaging
          pandas
          pyarrow
          pyyaml
          requests
          tqdm
          xxhash
        ];
        pythonRelaxDeps = (old.pythonRelaxDeps or [ ]) ++ [
          "dill"
          "fsspec"
          "multiprocess"
        ];
      };
    };

    tyro = olderRelease pyfinal pyprev.tyro {
      version = "0.8.14";
      hash = "sha256-JRbjTSF2NXUVlFnDsV/koTRyohZt/zIWnJ16q3CFMFg=";
      # 0.8 builds with setuptools (1.x, nixpkgs' release, with hatchling).
      overrides = _: {
        build-system = [ pyfinal.setuptools ];
        dependencies = with pyfinal; [
          docstring-parser
          rich
          shtab
          typing-extensions
        ];
      };
    };

    gradio-client = fromWheel pyfinal {
      pname = "gradio-client";
      version = "1.14.0";
      hash = "sha256-mi9RUZeEEeD4tVotOM3dCpRJGFEUnRTbSvlvWgl3SCU=";
      dependencies = with pyfinal; [
        fsspec
        httpx
        huggingface-hub
        packaging
        typing-extensions
        websockets
      ];
      pythonRelaxDeps = [ "websockets" ];
      description = "Python client for Gradio apps";
    };

    gradio = fromWheel pyfinal {
      pname = "gradio";
      version = "5.50.0";
      hash = "sha256-0Gdw1XzdqbcD75z3Z6yTqJCg4S2CZ5oxDu90IDo2c/Q=";
      # The wheel's Requires-Dist. Its upper caps on aiofiles, pillow, pydantic and tomlkit are
      # below nixpkgs' releases of the same major versions; ruff is no runtime dependency.
      dependencies = with pyfinal; [
        aiofiles
        anyio
        audioop-lts
        brotli
        fastapi
        ffmpy
        gradio-client
        groovy
        httpx
        huggingface-hub
        jinja2
        markupsafe
        numpy
        orjson
        packaging
        pandas
        pillow
        pydantic
        pydub
        python-multipart
        pyyaml
        safehttpx
        semantic-version
        starlette
        tomlkit
        typer
        typing-extensions
        uvicorn
      ];
      pythonRelaxDeps = [
        "aiofiles"
        "pillow"
        "pydantic"
        "tomlkit"
      ];
      pythonRemoveDeps = [ "ruff" ];
      description = "Web UIs for machine learning models";
    };

    llamafactory =
      let
        # nixpkgs' torchvision and torchaudio would compile CUDA code for a CUDA torch (above).
        withVisionAudio = !(pyfinal.torch.cudaSupport or false);
        leftOut = [
          "torchvision"
          "torchaudio"
        ];
      in
      pyfinal.buildPythonPackage {
        pname = "llamafactory";
        inherit version;
        pyproject = true;
        src = source;

        build-system = [ pyfinal.hatchling ];

        # LLaMA-Factory's `dependencies`, in its order (torchvision and torchaudio, its second and
        # third, last).
        dependencies =
          with pyfinal;
          [
            torch
            transformers
            datasets
            accelerate
            peft
            trl
            torchdata
            gradio
            matplotlib
            tyro
            einops
            numpy
            pandas
            scipy
            sentencepiece
            tiktoken
            modelscope
            hf-transfer
            safetensors
            av
            fire
            omegaconf
            packaging
            protobuf
            pyyaml
            pydantic
            uvicorn
            fastapi
            sse-starlette
          ]
          ++ lib.optionals withVisionAudio [
            torchvision
            torchaudio
          ];

        # av (PyAV, video inputs only) is compiled against ffmpeg; a release at LLaMA-Factory's cap
        # (<=16.0.0) would be built from source, so nixpkgs' newer one is used.
        pythonRelaxDeps = [ "av" ];
        pythonRemoveDeps = lib.optionals (!withVisionAudio) leftOut;

        postPatch = lib.optionalString (!withVisionAudio) ''
          cp ${./no_torchaudio.py} src/llamafactory/data/no_torchaudio.py
          substituteInPlace src/llamafactory/data/mm_plugin.py \
            --replace-fail "import torchaudio" "from . import no_torchaudio as torchaudio"
        '';

        pythonImportsCheck = [
          "llamafactory"
          "llamafactory.train.tuner"
          "llamafactory.webui.interface"
        ];

        passthru = {
          inherit source;
          withoutPackages = lib.optionals (!withVisionAudio) leftOut;
        };

        meta = {
          description = "Unified efficient fine-tuning of 100+ LLMs (LLaMA-Factory)";
          homepage = "https://github.com/hiyouga/LLaMA-Factory";
          changelog = "https://github.com/hiyouga/LLaMA-Factory/releases/tag/v${version}";
          mainProgram = "llamafactory-cli";
        };
      };
  };

  python = python3.override {
    self = python;
    packageOverrides = pins;
  };
in
{
  inherit source version;
  inherit (python.pkgs) llamafactory;
  # llamafactory-cli (and lmf), with bitsandbytes for `quantization_bit` (QLoRA).
  python = python.withPackages (ps: [
    ps.llamafactory
    ps.bitsandbytes
  ]);
}
