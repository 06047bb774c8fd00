"""Generated from protos/devrep/v1/devrep.proto by devrep.service._codegen; do not edit."""
