from llamaduo_synthesizer.app import main

main()
