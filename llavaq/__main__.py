from llavaq.cli import main

main()
