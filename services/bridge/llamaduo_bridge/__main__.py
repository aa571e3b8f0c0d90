from llamaduo_bridge.app import main

main()
