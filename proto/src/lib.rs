//! The gRPC contract of qga-bridge (package qga.bridge.v1), generated with tonic and prost
