from ._demo import main


if __name__ == "__main__":  # Not when documentation tools import every module.
    main()
