"""Generated from protos/devrep/v1/devrep.proto by devrep.wire._codegen; do not edit."""
